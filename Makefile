# The two commands of the README:
#   make demo   set up, then the shipped model on the embedded sample (Dice, overlays, a healthy
#               volume), and the smoke run: convert, the whole training recipe for a few epochs
#               (first stage, negatives, refiner: models/model.pt and refiner.pt), evaluate, all in MLflow
#   make test   set up, then run the test suite
# Everything runs from the repository root, inside .venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BUNDLE := bundles/brain_tumor_mri_seg
DATA   ?= data/brain-tumor-coco-sample
RUN    ?= runs/demo
SETTINGS ?= configs/demo.yaml
EVAL_LIST ?= test
TRACKING_DIR ?= mlflow
# a workflow's config layers come from their one definition (tumorseg.bundle.WORKFLOWS), with
# SETTINGS on top; `=`, not `:=`: read once .venv exists
TRAIN_CONFIGS = "$(shell $(BIN)/python -m tumorseg.bundle train $(SETTINGS))"
EVAL_CONFIGS  = "$(shell $(BIN)/python -m tumorseg.bundle evaluate $(SETTINGS))"
RUN_ARGS := --bundle_root $(BUNDLE) --dataset_dir $(RUN)/dataset --ckpt_dir $(RUN)/models --output_dir $(RUN)/eval \
            --tracking configs/mlflow.json --tracking_dir $(TRACKING_DIR)

.PHONY: setup demo test lint mlflow-ui clean monailabel-venv monailabel-app monailabel-serve model-card

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel on this machine's disk, so that nothing later can pull a
# CUDA build; GPU users: see README ("Installing on a GPU machine").
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# 1. the shipped model at work: evaluated on the sample's held-out slices (Dice printed), masks and
#    overlays of those slices and of a real healthy volume; 2. the pipeline's smoke run: convert,
#    every stage of the training recipe for a few epochs, evaluate the cascade it made; everything
#    tracked in MLflow.
SHIPPED_EVAL = "$(shell $(BIN)/python -m tumorseg.bundle evaluate)"
HEALTHY_VOLUME = $(shell $(BIN)/python -c "from nibabel.testing import data_path; print(data_path)")/anatomical.nii
demo: setup
	$(BIN)/python -m data_tools $(DATA) $(RUN)/dataset
	$(BIN)/python -m monai.bundle run --config_file $(SHIPPED_EVAL) --bundle_root $(BUNDLE) --dataset_dir $(RUN)/dataset --eval_list $(EVAL_LIST) \
	    --output_dir $(RUN)/shipped --tracking configs/mlflow.json --tracking_dir $(TRACKING_DIR)
	$(BIN)/python -c "import json; s = json.load(open('$(RUN)/shipped/evaluate_$(EVAL_LIST)/summary.json')); \
	    print(f'shipped model on the sample\'s $(EVAL_LIST) slices: per-image Dice {s[\"per_image\"][\"dice\"][\"mean\"]:.3f} over {s[\"images\"]} slices')"
	$(BIN)/tumorseg-predict $(DATA)/$(EVAL_LIST) $(HEALTHY_VOLUME) --output $(RUN)/predictions --no-progress
	$(BIN)/python -m monai.bundle run training --config_file $(TRAIN_CONFIGS) $(RUN_ARGS)
	$(BIN)/python -m monai.bundle run --config_file $(EVAL_CONFIGS) $(RUN_ARGS) --eval_list $(EVAL_LIST) \
	    --refiner_checkpoint $(RUN)/models/refiner.pt
	$(BIN)/tumorseg-runs --tracking-dir $(TRACKING_DIR) --last 6
	@echo "look at: $(RUN)/predictions/*_overlay.png (masks and overlays of the shipped model; anatomical_overlay.png: a healthy volume),"
	@echo "         $(RUN)/shipped/evaluate_$(EVAL_LIST)/report.html, and the runs above in 'make mlflow-ui' (http://127.0.0.1:5000)"

# the suite in TEST_WORKERS processes (pytest-xdist; a test file stays in one worker, so its
# fixtures are made once), one OpenMP thread each: most tests wait on subprocesses and servers
TEST_WORKERS ?= auto
test: setup
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff (lint and format) and mypy (types of src/), configured in pyproject.toml; fails on any finding
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The model card's figures from the shipped weights, on the full Kaggle download:
#   make model-card KAGGLE=<folder with train/ and valid/ COCO splits>
KAGGLE ?= ../shared/data/brain-tumor-coco
model-card: setup
	$(BIN)/tumorseg-convert $(KAGGLE) runs/kaggle-full
	$(BIN)/python -m experiments.model_card --dataset_dir runs/kaggle-full --tracking_dir $(TRACKING_DIR)

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(TRACKING_DIR))/mlruns.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf runs $(TRACKING_DIR)

# MONAI Label cannot share .venv (it pins numpy < 2 and pydicom 2 through its dependencies):
# its own venv, without deps resolution for monailabel itself, so the CPU torch stays.
ML_VENV ?= .venv-monailabel
ML_TUMORSEG := $(ML_VENV)/.tumorseg-$(shell $(PYTHON) -c "import hashlib, pathlib; print(hashlib.sha256(b''.join(p.read_bytes() for p in sorted(pathlib.Path('src').rglob('*.py')) + [pathlib.Path('pyproject.toml')])).hexdigest()[:12])")
monailabel-venv: $(ML_VENV)/.installed $(ML_TUMORSEG)
$(ML_VENV)/.installed:
	$(PYTHON) -m venv $(ML_VENV)
	$(ML_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(ML_VENV)/bin/pip install -q --disable-pip-version-check --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	$(ML_VENV)/bin/pip install -q --disable-pip-version-check monai==1.6.1 uvicorn fastapi pydantic pydantic-settings \
	    python-dotenv python-multipart pyjwt passlib requests requests-toolbelt cachetools schedule timeloop watchdog \
	    expiring_dict google-auth "dicomweb-client==0.59.3" "pydicom==2.4.4" SimpleITK "jsonschema<4" itk-io pynrrd \
	    girder-client psutil nibabel scikit-image shapely pillow pyyaml pytorch-ignite==0.5.5 tqdm fire \
	    || true  # pip reports monailabel's unmet pins, as expected; pyyaml, ignite, tqdm, fire: the bundle's configs, training, CLI
	$(ML_VENV)/bin/python -c "import monailabel, monai, torch, yaml, ignite, tqdm, scipy, skimage, fire; print('monailabel', monailabel.__version__, 'torch', torch.__version__)"
	touch $@

# the bundle's code, tumorseg, as MONAI Label's environment gets it: its wheel built from this
# repository (no copy of source files), rebuilt whenever the package changes
$(ML_TUMORSEG): $(ML_VENV)/.installed
	rm -f $(ML_VENV)/.tumorseg-* && rm -rf build/ml-wheel
	$(ML_VENV)/bin/pip wheel -q --disable-pip-version-check --no-deps -w build/ml-wheel .
	$(ML_VENV)/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall build/ml-wheel/tumorseg-*.whl
	touch $@

# Export the bundle (configs, weights, docs) into the MONAI Label app, then serve it.
# A re-export keeps what MONAI Label trained into the export (model/<bundle>/models/monailabel/).
CHECKPOINT ?= $(BUNDLE)/models/model.pt
# MONAI Label writes its datastore and labels into this folder (a comment on the line of a
# variable would end up in its value)
STUDIES ?= runs/monailabel-studies
ML_PORT ?= 8000
monailabel-app: setup
	$(BIN)/tumorseg-export monailabel_app/model --checkpoint $(CHECKPOINT)

# CORS open to the server's own origin only (main.py reads TUMORSEG_CORS_ORIGINS: MONAI Label's
# MONAI_LABEL_CORS_ORIGINS crashes start_server in 0.8.5, and empty it allows every origin)
monailabel-serve: monailabel-venv monailabel-app
	mkdir -p $(STUDIES) && cp -n data/brain-tumor-coco-sample/test/*.jpg $(STUDIES)/
	PATH=$(abspath $(ML_VENV))/bin:$$PATH TUMORSEG_CORS_ORIGINS=http://127.0.0.1:$(ML_PORT) \
	    $(ML_VENV)/bin/monailabel start_server --app monailabel_app \
	    --studies $(STUDIES) --host 127.0.0.1 --port $(ML_PORT) --conf models brain_tumor_mri_seg

# A local PACS to try `tumorseg-predict URL --output DIR` on: Debian's Orthanc
# with its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb) on 127.0.0.1, as
# tests/test_pacs.py runs it, storage in PACS_DIR, its login that of TUMORSEG_DICOMWEB_USER and
# TUMORSEG_DICOMWEB_PASSWORD (set them in the environment); DICOMweb root http://127.0.0.1:PACS_PORT/dicom-web
PACS_DIR ?= runs/pacs
PACS_PORT ?= 8042
PACS_DICOM_PORT ?= 4242
.PHONY: pacs-serve
pacs-serve: setup
	$(BIN)/python tests/pacs_server.py $(PACS_DIR) $(PACS_PORT) $(PACS_DICOM_PORT)

# MONAI Label on the PACS: the local Orthanc of `make pacs-serve` (in the background, stopped
# with this target; one sample MR series stored on it where it holds none, unless PACS_SAMPLE=0)
# and MONAI Label with --studies on its DICOMweb root PACS_ROOT, on http://127.0.0.1:ML_PORT:
# the MR series listed, /infer predicts one as a volume (as tumorseg-predict does), a final label
# saved is stored back on the PACS as a DICOM SEG, /train trains on the labelled series. The
# login of TUMORSEG_DICOMWEB_USER and TUMORSEG_DICOMWEB_PASSWORD (set them) serves both; MONAI
# Label's DICOM cache in PACS_LABEL_CACHE.
PACS_SAMPLE ?= 1
PACS_LABEL_CACHE ?= runs/pacs-label-cache
PACS_ROOT = http://127.0.0.1:$(PACS_PORT)/dicom-web
.PHONY: pacs-label
pacs-label: setup monailabel-venv monailabel-app
	@test -n "$$TUMORSEG_DICOMWEB_USER" -a -n "$$TUMORSEG_DICOMWEB_PASSWORD" || \
	    { echo "set TUMORSEG_DICOMWEB_USER and TUMORSEG_DICOMWEB_PASSWORD (the PACS login)"; exit 2; }
	$(BIN)/python tests/pacs_server.py $(PACS_DIR) $(PACS_PORT) $(PACS_DICOM_PORT) & orthanc=$$!; \
	trap 'kill $$orthanc 2>/dev/null' EXIT INT TERM; \
	PYTHONPATH=tests $(BIN)/python -c "import os; import pacs_server as p; \
	    login = (os.environ['TUMORSEG_DICOMWEB_USER'], os.environ['TUMORSEG_DICOMWEB_PASSWORD']); \
	    p.wait_until_serving('$(PACS_ROOT)', login); $(if $(filter 1,$(PACS_SAMPLE)),p.ensure_sample_series('$(PACS_ROOT)', login))" || exit 1; \
	PATH=$(abspath $(ML_VENV))/bin:$$PATH TUMORSEG_CORS_ORIGINS=http://127.0.0.1:$(ML_PORT) MONAI_LABEL_DICOMWEB_CACHE_PATH=$(PACS_LABEL_CACHE) \
	    $(ML_VENV)/bin/monailabel start_server --app monailabel_app \
	    --studies $(PACS_ROOT) --host 127.0.0.1 --port $(ML_PORT) --conf models brain_tumor_mri_seg

# The two commands of the README:
#   make demo   set up, then convert the embedded sample, train a few epochs, evaluate, all in MLflow
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
TRAIN_CONFIGS := "['$(BUNDLE)/configs/train.yaml','$(SETTINGS)']"
EVAL_CONFIGS  := "['$(BUNDLE)/configs/train.yaml','$(SETTINGS)','$(BUNDLE)/configs/evaluate.yaml']"
RUN_ARGS := --dataset_dir $(RUN)/dataset --ckpt_dir $(RUN)/models --output_dir $(RUN)/eval \
            --tracking configs/mlflow.json --tracking_dir $(TRACKING_DIR)

.PHONY: setup demo train evaluate test mlflow-ui clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel on this machine's disk, so that nothing later can pull a
# CUDA build; GPU users: see README ("Installing on a GPU machine").
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python -m data_tools $(DATA) $(RUN)/dataset
	$(BIN)/python -m monai.bundle run training --config_file $(TRAIN_CONFIGS) $(RUN_ARGS)
	$(BIN)/python -m monai.bundle run --config_file $(EVAL_CONFIGS) $(RUN_ARGS) --eval_list $(EVAL_LIST)
	$(BIN)/tumorseg-runs --tracking-dir $(TRACKING_DIR) --last 2

test: setup
	$(BIN)/python -m pytest -q

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(TRACKING_DIR))/mlruns.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf runs $(TRACKING_DIR)

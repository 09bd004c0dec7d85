import sys

from data_tools.coco_to_monai import main

sys.exit(main())

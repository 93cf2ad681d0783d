import sys

from cifar_pipeline.cli import main

sys.exit(main())

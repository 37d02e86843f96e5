"""`python -m hpcgan.classify key=value ...` (also under torchrun / srun): see hpcgan.classify.run."""
import sys

from hpcgan.classify.run import main

if __name__ == "__main__":
    sys.exit(main())

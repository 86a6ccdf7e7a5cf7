"""`python -m safety_dpo.cli`, which `accelerate launch -m` and `torchrun -m` run: the `safety-dpo` command."""

import sys

from safety_dpo.cli import main

if __name__ == "__main__":
    sys.exit(main())

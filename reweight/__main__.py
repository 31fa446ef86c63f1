"""``python -m reweight``: the Hydra app of :mod:`reweight.cli`."""

from reweight.cli import main

if __name__ == "__main__":
    main()

"""``python -m shards.synth``: the generator's command line (:mod:`shards.synth.cli`)."""

from shards.synth.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

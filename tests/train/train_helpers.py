"""The training tests' helpers now live in ``tests/conftest.py``; this module re-exports them
so that ``from train_helpers import ...`` keeps working. New tests: ``from conftest import ...``.
"""

from conftest import (TINY, WORDS, cli_args, flat_settings, make_model_dir,  # noqa: F401
                      make_workspace, tbt_cli, write_corpus)

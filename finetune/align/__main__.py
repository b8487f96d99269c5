"""``python -m finetune.align``: the alignment recipe's command line (``finetune.align.cli``)."""

from finetune.align.cli import main

main()

"""Stages around fine-tuning (placeholder, filled below)."""


def alignment_stage(base, c, splits, fmt):
    if c.align.method is None:
        return base
    raise NotImplementedError

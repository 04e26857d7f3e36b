"""Studies: the experiments the papers run, built from the stages below them.

    embedded.py       the embedded base model: its spec, its pre-training recipe, its probes
    sweep.py          a learning-rate x epochs grid of fine-tuning runs, evaluated
    quickstart.py     the embedded default end to end: sweep, analysis, merge, report
    curation.py       PreMemAcc-driven data curation (Kang et al. Algorithm 1)
    sampler_study.py  memorization-based curriculum and other samplers (Ge et al.)
"""

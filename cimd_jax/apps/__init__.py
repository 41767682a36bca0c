"""Applications on top of the library: what each --mode of main.py runs (modes), the
demo, the sampler comparison."""

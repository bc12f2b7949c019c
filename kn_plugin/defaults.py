"""The paper's settings that every entry point defaults to (a module without dependencies, so
that the command line reads them without importing torch)."""

#: the paper's m: steps of the right Riemann sum of Integrated Gradients
PAPER_STEPS = 20

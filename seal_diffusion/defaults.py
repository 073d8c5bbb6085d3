"""The defaults the command line shows in ``--help``, in a module that imports nothing.

``seal-diffusion --help`` and every ``COMMAND --help`` build the whole parser, which needs these values; keeping them
here (the library modules that use them import them from here) lets the parser start without torch (~0.1 s instead
of seconds). ``tests/test_imports.py`` checks that ``--help`` loads no torch.
"""

THRESHOLD = 3.3  # detect when −log10 p ≥ this (p < 5·10⁻⁴): verify, scan, robustness, verify-images

DEMO_STEPS = 60  # training steps of each LoRA in `demo`

FUNCTIONAL_PROBES = 12  # secret probes of `verify --functional` (at half the model's latent size)

CHALLENGE_N = 32  # images of an image challenge
CHALLENGE_STEPS = 4  # sampler steps of an image challenge on the tiny test models (20 on real models)
CHALLENGE_GUIDANCE = 7.5  # classifier-free guidance of an image challenge

COMPARE_SUBJECT = "sks cat"
COMPARE_SEEDS = (0, 1)
COMPARE_STEPS = 25
COMPARE_GUIDANCE = 7.5

SWEEP_SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)  # passport stds of `sigma-sweep` (paper Table 16)
SWEEP_TRAIN_STEPS = 30
SWEEP_LR = 5e-3
SWEEP_BATCH = 1

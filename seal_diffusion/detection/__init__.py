"""Does this file, model or set of images derive from my release: the weight test (recovery, verify, scan), the
function-level test (probes, the owner's probe cache, functional) and the check from images (challenge, sampler,
check).

It imports :mod:`~seal_diffusion.evaluation`, :mod:`~seal_diffusion.core` and the floors below them.
"""

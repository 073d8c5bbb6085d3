"""Who was first: RFC 3161 timestamps of a key's commitment, the claim check, the genuine-pair test, forged claims
and the dispute between several claims.

It imports :mod:`~seal_diffusion.detection` and the floors below it.
"""

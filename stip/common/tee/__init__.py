"""TEE mode's shared contracts: what its bundles are named and hold, the masks' algebra, sealing and measurement.

The developer writes TEE bundles, the server's worker and the enclave read them: each imports these modules, never
another party's code.
"""

"""The CryoFastAR network, pose solver and training (uses :mod:`cryofastar.recon`).

(The network lands with the network issue; this package is empty until then.)
"""

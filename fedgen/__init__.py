"""fedgen: federated diffusion models that fix non-IID data in federated image
classification, on Flower and diffusers.

Not to be confused with FedGen, the data-free knowledge-distillation FL algorithm.
"""

__version__ = "0.1.0"

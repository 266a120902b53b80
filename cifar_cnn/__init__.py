"""cifar_cnn: a Lightning + Hydra baseline for CIFAR-10 image classification.

Importing the package changes nothing: the entry points (train.py, eval.py) register the
OmegaConf resolvers (`cifar_cnn.resolvers`) and silence known library warnings
(`cifar_cnn.runtime`); a training run sets its process settings as it starts (`training.train`).
"""

"""The two Python files an ``OUT/hf-nas/`` folder carries (copied into it as they are, for ``trust_remote_code``).

``configuration_decilm.py`` is what vLLM and TensorRT-LLM run to read ``block_configs``; ``modeling_decilm.py`` is
what transformers runs to compute the model. Both import only transformers and torch (never prune2deploy): the
folder must load where prune2deploy is not installed. Nothing is imported here, so loading the output writers
does not import torch.
"""

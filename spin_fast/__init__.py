"""spin_fast: a performance-engineered trainer for SPIN (Self-Play fIne-tuNing, Chen et al. 2024).

Subpackage `spin_fast.kernels`: fused log-prob + SPIN loss kernels (Triton and chunked PyTorch).
Modules, from the bottom up:
  loss.py       the reference SPIN loss and log-probs (the oracle of every test)
  errors.py     InputError, the one exception type for bad user input (one line, exit 2)
  rows.py       reading data files and the one row validator of every reader (file:row errors)
  template.py   chat templates in a sandboxed Jinja environment with a time and size limit
  chat.py       chat-template rendering, shared by sampler and trainer
  data.py       training pairs from three row schemas, rendered and truncated
  packing.py    pair-preserving token-budget packing and collation (C++ in csrc/, Python reference)
  model.py      the Llama-family decoder (+ attention.py, hf_io.py for HF folders in and out)
  sampler.py    KV-cached, continuously batched generation with per-prompt seeding
  generate.py   `python -m spin_fast.generate`, the sampler as a tool
  refcache.py   the opponent's per-pair reference log-probs, fingerprinted safetensors
"""
__version__ = "0.1.0"

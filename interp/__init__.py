"""safety-layers: find and protect the safety layers of aligned chat models
(Li et al., ICLR 2025), on TransformerLens's TransformerBridge."""

__version__ = "0.1.0"

"""transformers' backbone utilities, imported from where the installed version keeps them.

`BackboneMixin`, `BackboneConfigMixin` and `load_backbone` live in `transformers.backbone_utils` in recent 5.x
releases and in `transformers.utils.backbone_utils` before (that module later only re-exports them, with a
deprecation warning). Files of this package import them from here.
"""

try:
    from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin, load_backbone
except ImportError:  # older transformers
    from transformers.utils.backbone_utils import BackboneConfigMixin, BackboneMixin, load_backbone


__all__ = ["BackboneConfigMixin", "BackboneMixin", "load_backbone"]

"""The finetuning backbone from a weights file: a LOCA pretraining checkpoint (teacher or student), a finetuned
segmentation checkpoint (its one backbone, e.g. to finetune on another dataset), or timm-format ViT weights.

Every message names the config key to set (``model.init_args.*``), as a CLI user sees them.
"""

from __future__ import annotations

import logging
from typing import Any

from loca_lightning.backbones import build_backbone, load_backbone_weights
from loca_lightning.backbones.vit import ViT
from loca_lightning.weights_files import CheckpointFileError, check_activation, load_weights_file

log = logging.getLogger(__name__)

KEY = "model.init_args"  # where the module's arguments live in a `loca` config


def pretrained_backbone(
    name: str, backbone_kwargs: dict[str, Any], pretrained: str, weights: str, trust: bool, **build_kwargs: Any
) -> tuple[ViT, dict[str, Any]]:
    """Backbone ``name`` built with the MLP activation ``pretrained`` records (unless ``backbone_kwargs`` sets one) and
    loaded strictly with its ``weights`` ("teacher" or "student"); returns it and the ``backbone_kwargs`` it was built
    with, for the hyperparameters. Files are read with ``weights_only=True`` unless ``trust``."""
    checkpoint = load_weights_file(pretrained, trust=trust)
    backbone_kwargs = dict(backbone_kwargs)
    act_layer = check_activation(
        backbone_kwargs.get("act_layer"), pretrained, checkpoint, f"{KEY}.backbone_kwargs.act_layer"
    )
    if act_layer is not None and "act_layer" not in backbone_kwargs:  # e.g. tanh GELU for the release's weights
        log.info("act_layer %r adopted from %s", act_layer, pretrained)
        backbone_kwargs["act_layer"] = act_layer
    backbone = build_backbone(name, **build_kwargs, **backbone_kwargs)
    try:
        load_backbone_weights(backbone, checkpoint, which=weights, key=f"{KEY}.pretrained_weights")
    except CheckpointFileError:  # not a weights file at all: its own message says what it is
        raise
    except (ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{KEY}.pretrained={pretrained!r} does not fit {KEY}.backbone={name!r}: {message}") from error
    log.info("backbone initialised from %s (%s weights)", pretrained, weights)
    return backbone, backbone_kwargs

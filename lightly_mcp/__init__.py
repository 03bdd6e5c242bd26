"""lightly-mcp: Momentum Contrastive Pruning for lightly.

Prune a self-supervised MoCo model once, without labels and without fine-tuning, and
ship the momentum subnet: the momentum encoder seen through a channel mask found by
ADMM on the query encoder.

``import lightly_mcp`` loads the building blocks only (torch, torchvision, timm,
torch-pruning): the Lightning methods ``MCP`` and ``MoCoV2`` are imported on first
use, and the command line, recipes and export load Lightning, rich and YAML
themselves.
"""

from typing import TYPE_CHECKING, Any

from lightly_mcp.errors import InputError, MCPError, MCPWarning
from lightly_mcp.methods.backbones import Backbone, build_backbone
from lightly_mcp.methods.transforms import MCPTransform, build_transform
from lightly_mcp.pruning.admm import ADMMRegularizer, project_onto_channel_budget
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import (
    ChannelGroup,
    GroupMember,
    NoPrunableGroupsError,
    UnsupportedBackboneError,
    num_kept_channels,
)
from lightly_mcp.pruning.masks import GroupMasks
from lightly_mcp.pruning.measure import count_macs, count_parameters
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from lightly_mcp.pruning.pruning_ratio import solve_pruning_ratio
from lightly_mcp.pruning.transition import SmoothTransition

if TYPE_CHECKING:
    from lightly_mcp.formats.export import export
    from lightly_mcp.methods.mcp import MCP
    from lightly_mcp.methods.moco_v2 import MoCoV2

__version__ = "0.1.0"

#: The Lightning methods and the export, imported on first use (PEP 562).
_METHODS = {
    "MCP": "lightly_mcp.methods.mcp",
    "MoCoV2": "lightly_mcp.methods.moco_v2",
    "export": "lightly_mcp.formats.export",
}


def __getattr__(name: str) -> Any:
    if name in _METHODS:
        import importlib

        return getattr(importlib.import_module(_METHODS[name]), name)
    raise AttributeError(f"module 'lightly_mcp' has no attribute {name!r}")


__all__ = [
    "ADMMRegularizer",
    "Backbone",
    "MCP",
    "MCPTransform",
    "MoCoV2",
    "ChannelGroup",
    "GroupMasks",
    "InputError",
    "MCPError",
    "MCPWarning",
    "GroupMember",
    "MomentumSubnet",
    "NoPrunableGroupsError",
    "SmoothTransition",
    "UnsupportedBackboneError",
    "build_backbone",
    "build_transform",
    "compact",
    "export",
    "count_macs",
    "count_parameters",
    "find_channel_groups",
    "num_kept_channels",
    "project_onto_channel_budget",
    "solve_pruning_ratio",
]

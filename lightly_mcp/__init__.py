"""lightly-mcp: Momentum Contrastive Pruning for lightly.

Prune a self-supervised MoCo model once, without labels and without fine-tuning, and
ship the momentum subnet: the momentum encoder seen through a channel mask found by
ADMM on the query encoder.
"""

from lightly_mcp.admm import ADMMRegularizer, project_onto_channel_budget
from lightly_mcp.backbones import Backbone, build_backbone
from lightly_mcp.compaction import compact
from lightly_mcp.counting import count_macs, count_parameters
from lightly_mcp.groups import (
    ChannelGroup,
    GroupMember,
    NoPrunableGroupsError,
    UnsupportedBackboneError,
    find_channel_groups,
    num_kept_channels,
)
from lightly_mcp.mcp import MCP
from lightly_mcp.moco_v2 import MoCoV2
from lightly_mcp.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning_ratio import solve_pruning_ratio
from lightly_mcp.transforms import MCPTransform, build_transform
from lightly_mcp.transition import SmoothTransition

__version__ = "0.1.0"

__all__ = [
    "ADMMRegularizer",
    "Backbone",
    "MCP",
    "MCPTransform",
    "MoCoV2",
    "ChannelGroup",
    "GroupMember",
    "MomentumSubnet",
    "NoPrunableGroupsError",
    "SmoothTransition",
    "UnsupportedBackboneError",
    "build_backbone",
    "build_transform",
    "compact",
    "count_macs",
    "count_parameters",
    "find_channel_groups",
    "num_kept_channels",
    "project_onto_channel_budget",
    "solve_pruning_ratio",
]

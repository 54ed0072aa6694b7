"""The parts the passes put into the decoder, built from the checkpoint with every weight lazy."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from graphs.builder import FLOAT, initializer
from graphs.decoder import TEXT_PREFIXES
from graphs.embedding_merge import build_embedding_merge
from graphs.rope_index import build_rope_index
from graphs.vision import build_vision_model
from merge.contract.config import ModelConfig
from merge.contract.names import EMBEDDING_PREFIX, OPSET, POSITION_PREFIX, TOKEN_TABLE
from merge.errors import MergeError
from merge.sources.checkpoint import Checkpoint
from merge.sources.source import ModelSource

from .passes import Parts

log = logging.getLogger(__name__)



def make_parts(source: ModelSource, checkpoint: Checkpoint | None = None) -> Parts:
    """The vision part, the embedding merge, the rope index and the token table; every weight lazy."""
    config = source.config
    checkpoint = checkpoint or Checkpoint(source.folder)
    return Parts(
        vision=build_vision_model(checkpoint, config.vision),
        embedding_merge=build_embedding_merge(config.image_token_id, config.text.hidden_size,
                                              len(config.vision.deepstack_visual_indexes),
                                              prefix=EMBEDDING_PREFIX, video_token_id=config.video_token_id),
        rope_index=build_rope_index(config.image_token_id, config.vision.spatial_merge_size, opset=OPSET,
                                    prefix=POSITION_PREFIX, video_token_id=config.video_token_id),
        embed_tokens=token_table(checkpoint, config),
    )


def token_table(checkpoint: Checkpoint, config: ModelConfig) -> ir.Value:
    """The checkpoint's token embedding table [vocab, hidden] as a lazy initializer (read only if written)."""
    name = checkpoint.find_prefix(TEXT_PREFIXES, "embed_tokens.weight") + "embed_tokens.weight"
    shape = checkpoint.shape(name)
    if list(shape) != [config.text.vocab_size, config.text.hidden_size]:
        raise MergeError(f"{checkpoint.folder}: {name} has shape {shape}, not [vocab_size, hidden_size] = "
                         f"[{config.text.vocab_size}, {config.text.hidden_size}]")
    return initializer(TOKEN_TABLE, ir.LazyTensor(lambda: ir.tensor(checkpoint.load(name), name=TOKEN_TABLE), FLOAT,
                                                  ir.Shape(list(shape))))




def export_vision(folder: Path, config: ModelConfig, out_path: Path) -> Path:
    """The vision part alone, written to ``out_path`` with its weights in ``<name>.data`` beside it (tests and
    benchmarks run it on its own)."""
    model = build_vision_model(Checkpoint(folder), config.vision)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, out_path, external_data=out_path.name + ".data")
    return out_path

"""Base models, adapter stacks on diffusers pipelines, and generation."""
import logging


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers 5 warns on every start that CLIPImageProcessor falls back to its PIL version when
    torchvision is missing; lyco never uses an image processor (no safety checker), so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())

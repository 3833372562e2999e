"""The small model config the model, training, evaluation and IoU-head tests share, and a recorder of its decodes."""
import dataclasses

from training.model import FluoroSAM, get_config

MINI = dataclasses.replace(get_config("tiny"), name="mini", image_size=64, swin_embed_dim=16,
                           swin_depths=(1, 1, 1), swin_heads=(1, 2, 4), window_size=4, embed_stride=8,
                           codebook_size=16, decoder_mlp_dim=64, drop_path_rate=0.0)


def record_decodes(model: FluoroSAM, multimask_only: bool = False) -> list[tuple]:
    """Wrap ``model.decode_all_tokens``; each call appends (clicks, mask_input, logits, iou), the logits and IoUs
    of all 4 output tokens or, with ``multimask_only``, of the 3 multimask ones."""
    calls = []
    decode = model.decode_all_tokens
    kept = slice(1, None) if multimask_only else slice(None)

    def recording_decode(embeddings, tokens, coords=None, labels=None, mask_input=None):
        logits, iou = decode(embeddings, tokens, coords, labels, mask_input)
        calls.append((0 if coords is None else coords.shape[1], mask_input, logits[:, kept].detach(),
                      iou[:, kept].detach()))
        return logits, iou

    model.decode_all_tokens = recording_decode
    return calls

"""What every family's training collator needs: rows of token ids padded into one tensor."""

from __future__ import annotations


def pad_ids(seqs: list, value: int):
    """Right-padded rows of token ids (1-D tensors) and their attention mask (1 on real tokens)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = pad_sequence(seqs, batch_first=True, padding_value=value)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()

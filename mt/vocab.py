"""Special token ids, fixed project-wide: every vocabulary reserves 0-3 for these."""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

"""Labelled datasets on disk, shared by the engine (conditioned generation) and the trainer: the
Cityscapes label table, train-id maps and palettes (`labels`), and the source readers (`sources`)."""

"""The benchmark of SPEC §7: prediction on the three tasks, text and segmentation metrics, aggregation, tables."""

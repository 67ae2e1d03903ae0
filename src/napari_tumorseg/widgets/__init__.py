"""Thin Qt dock widgets over `napari_tumorseg.core`; one file per widget."""

#: Display names of the plugin's dock widgets, as in napari.yaml (the demo opens them all).
DOCK_WIDGETS = ("Register sequences", "Segment tumour", "Review and correct", "Tumour volumes")

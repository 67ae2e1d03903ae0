"""The bundled models' names and the default one, without importing torch: the command line
builds its options from them before any model is loaded."""

#: The model `tumorseg segment`, the Python API and the Segment dock use unless told otherwise:
#: the 2D model, which the outside checks favour (docs/MODELS.md, "The default model").
DEFAULT_MODEL = "2d"
#: The bundled models, the default first (the order of the Segment dock's model picker).
BUNDLED = (DEFAULT_MODEL, "3d")

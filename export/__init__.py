"""Build-time code: training data (espeak-ng speech, the procedural mouth teacher), export."""

"""Knowledge transfer between ONNX models: parameters (transplant), structure (plan replay), repair."""

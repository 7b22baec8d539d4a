// Precompiled header for the C++ (not CUDA) files of every target: the torch headers dominate
// compile time, so they are parsed once per target (cmake/AnvilToolchain.cmake).
#pragma once
#include <torch/torch.h>
#include <torch/library.h>

# The wheel (pyproject.toml, scikit-build-core): what `cmake --install` puts where, the libraries' install
# RPATHs, and anvil/_build_info.py (the version, and the torch and CUDA this build is for).
#
# Installed layout (a venv; --user and Debian's dist-packages have the same shape):
#   <prefix>/lib/pythonX.Y/site-packages/anvil/   the .py files (the wheel copies bindings/anvil), _build_info.py,
#                                                 libanvil_*.so and _C*.so
#   <prefix>/lib/pythonX.Y/site-packages/torch/lib/   torch's libraries (the pinned torch wheel)
#   <prefix>/bin/anvil                            the command line (the wheel's scripts data)
# so every path an installed file needs is $ORIGIN-relative: nothing points into the build machine.
# Included at the end of CMakeLists.txt, after every target exists.

# The torch this build compiles against: an installed anvil refuses any other at import (its ABI is that one's).
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import torch; print(torch.__version__)"
  OUTPUT_VARIABLE ANVIL_TORCH_VERSION OUTPUT_STRIP_TRAILING_WHITESPACE)

# torch's CUDA wheels keep the CUDA runtime, cuBLAS and NVRTC in site-packages/nvidia/cu<major>/lib (torch
# 2.11 + CUDA 13: nvidia/cu13/lib); the op library links libnvrtc (torch's CMake config adds it) and, with
# kernels, libcudart, and RUNPATH applies to an object's own NEEDED entries only, so it must name that folder.
set(_anvil_nvidia_rel "")
if(ANVIL_TORCH_CUDA)
  string(REGEX REPLACE "^([0-9]+).*" "\\1" _anvil_cuda_major "${ANVIL_TORCH_CUDA}")
  set(_anvil_nvidia_rel "nvidia/cu${_anvil_cuda_major}/lib")
endif()

# The libraries sit in site-packages/anvil: each other through $ORIGIN, torch through $ORIGIN/../torch/lib.
set(_anvil_lib_rpath "$ORIGIN" "$ORIGIN/../torch/lib")
if(_anvil_nvidia_rel)
  list(APPEND _anvil_lib_rpath "$ORIGIN/../${_anvil_nvidia_rel}")
endif()
set(_anvil_libs anvil_ops anvil_core anvil_lora anvil_finetune anvil_distill anvil_quantize anvil_recipes)
if(TARGET anvil_python)
  list(APPEND _anvil_libs anvil_python)
endif()
set_target_properties(${_anvil_libs} PROPERTIES INSTALL_RPATH "${_anvil_lib_rpath}")

# The executable sits in <prefix>/bin: site-packages is ../lib/pythonX.Y/site-packages (a venv, pip --user),
# or ../lib/pythonX.Y/dist-packages (Debian's pip into /usr/local).
set(_anvil_exe_rpath "")
foreach(site site-packages dist-packages)
  set(_site "$ORIGIN/../lib/python${Python_VERSION_MAJOR}.${Python_VERSION_MINOR}/${site}")
  list(APPEND _anvil_exe_rpath "${_site}/anvil" "${_site}/torch/lib")
  if(_anvil_nvidia_rel)
    list(APPEND _anvil_exe_rpath "${_site}/${_anvil_nvidia_rel}")
  endif()
endforeach()
set_target_properties(anvil PROPERTIES INSTALL_RPATH "${_anvil_exe_rpath}")

# anvil/_build_info.py, beside the libraries in the build tree too (so `import anvil` from build*/python has it).
set(ANVIL_BUILD_CUDA_KERNELS False)
set(ANVIL_BUILD_NVCC "")
if(ANVIL_WITH_CUDA)
  set(ANVIL_BUILD_CUDA_KERNELS True)
  set(ANVIL_BUILD_NVCC "${CMAKE_CUDA_COMPILER_VERSION}")
endif()
set(ANVIL_BUILD_SM90A False)
if(ANVIL_WITH_SM90A)
  set(ANVIL_BUILD_SM90A True)
endif()
configure_file(${CMAKE_CURRENT_SOURCE_DIR}/bindings/_build_info.py.in ${ANVIL_PYTHON_DIR}/_build_info.py @ONLY)

# The package's Python files are the wheel's (pyproject.toml: wheel.packages); CMake installs what it builds.
install(TARGETS ${_anvil_libs} LIBRARY DESTINATION anvil)
install(FILES ${ANVIL_PYTHON_DIR}/_build_info.py DESTINATION anvil)
# The embedded demos' files (anvil lora / distill / quantize with no config, anvil.lora() ...), so that they run
# from a wheel without the source tree: recipes/registry.cpp looks for anvil/demo beside its library.
install(DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/examples/tiny DESTINATION anvil/demo/examples
        PATTERN "make.sh" EXCLUDE PATTERN "*.py" EXCLUDE PATTERN "__pycache__" EXCLUDE)
if(DEFINED SKBUILD_SCRIPTS_DIR)
  install(TARGETS anvil RUNTIME DESTINATION ${SKBUILD_SCRIPTS_DIR})
else()
  install(TARGETS anvil RUNTIME DESTINATION bin)
endif()

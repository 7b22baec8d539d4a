# The toolchain anvil builds with: ccache, the Python that owns torch, LibTorch, and CUDA on or off.
#
# LibTorch comes from the Python torch wheel (never a separate libtorch zip), so the C++ library and
# `import torch` are the same build. CUDA is on when nvcc is found and torch was built with CUDA
# (ANVIL_CUDA=AUTO), or forced with ON/OFF. The architectures are explicit: CI has no GPU to detect.

# ccache, told that precompiled headers are fine (else it refuses every file that uses one) and that
# paths are relative to the source tree (so a fresh clone elsewhere still hits the cache).
find_program(ANVIL_CCACHE ccache)
if(ANVIL_CCACHE)
  set(_anvil_launcher ${CMAKE_COMMAND} -E env CCACHE_BASEDIR=${CMAKE_SOURCE_DIR}
      "CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime" ${ANVIL_CCACHE})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_anvil_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_anvil_launcher})
endif()

find_package(Python 3.10 REQUIRED COMPONENTS Interpreter OPTIONAL_COMPONENTS Development.Module)
if(ANVIL_PYTHON AND NOT Python_Development.Module_FOUND)
  message(WARNING "anvil: no Python headers for ${Python_EXECUTABLE}: anvil._C is not built "
                  "(torch.ops.anvil.* still work; install python3-dev for the module)")
  set(ANVIL_PYTHON OFF)
endif()
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import torch, sysconfig; print(torch.utils.cmake_prefix_path); print(torch.version.cuda or ''); print(sysconfig.get_config_var('EXT_SUFFIX'))"
  OUTPUT_VARIABLE _anvil_torch_info OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _anvil_torch_rc)
if(NOT _anvil_torch_rc EQUAL 0)
  message(FATAL_ERROR "anvil: ${Python_EXECUTABLE} cannot import torch; run scripts/setup.sh or pass -DPython_EXECUTABLE=")
endif()
string(REPLACE "\n" ";" _anvil_torch_info "${_anvil_torch_info}")
list(GET _anvil_torch_info 0 ANVIL_TORCH_PREFIX)
list(GET _anvil_torch_info 1 ANVIL_TORCH_CUDA)
list(GET _anvil_torch_info 2 ANVIL_PYTHON_EXT_SUFFIX)
list(APPEND CMAKE_PREFIX_PATH ${ANVIL_TORCH_PREFIX})

# ---- CUDA on or off ----
set(ANVIL_WITH_CUDA OFF)
if(NOT ANVIL_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND ANVIL_TORCH_CUDA)
    set(ANVIL_WITH_CUDA ON)
  elseif(ANVIL_CUDA STREQUAL "ON")
    message(FATAL_ERROR "anvil: ANVIL_CUDA=ON but nvcc='${CMAKE_CUDA_COMPILER}' and torch CUDA='${ANVIL_TORCH_CUDA}'")
  endif()
endif()

set(ANVIL_WITH_SM90A OFF)
if(ANVIL_WITH_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES ${ANVIL_CUDA_ARCHS})
  # The shared CUDA runtime, the one torch uses: CMake's default (cudart_static) would put a second
  # runtime, and the C++ library pieces it carries, into libanvil_ops.so.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  if(ANVIL_CUDA_ARCHS MATCHES "90a")
    set(ANVIL_WITH_SM90A ON)
  endif()
  # torch's CMake config turns TORCH_CUDA_ARCH_LIST into -gencode flags and would detect the local GPU
  # without it; give it the same list, then drop its flags: each target sets CUDA_ARCHITECTURES.
  set(_archs "")
  foreach(a ${ANVIL_CUDA_ARCHS})
    string(REGEX REPLACE "-real|-virtual" "" a "${a}")
    string(REGEX REPLACE "^([0-9]+)([0-9])(a?)$" "\\1.\\2\\3" a "${a}")
    list(APPEND _archs ${a})
  endforeach()
  set(TORCH_CUDA_ARCH_LIST "${_archs}" CACHE STRING "" FORCE)
  set(ENV{TORCH_CUDA_ARCH_LIST} "${_archs}")
endif()

# torch's config warns when it sees CMAKE_CUDA_ARCHITECTURES: hide it while torch looks.
set(_anvil_archs ${CMAKE_CUDA_ARCHITECTURES})
unset(CMAKE_CUDA_ARCHITECTURES)
find_package(Torch REQUIRED)
set(CMAKE_CUDA_ARCHITECTURES ${_anvil_archs})
if(ANVIL_WITH_CUDA)
  string(REGEX REPLACE "-gencode arch=[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  # Kernels must round exactly like the CPU references: no fast math, no flush-to-zero.
  string(APPEND CMAKE_CUDA_FLAGS " -Xcudafe --diag_suppress=20012 --expt-relaxed-constexpr")
endif()
# torch's flags: keep its ABI define, drop nothing else.
find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH)

# Precompiled torch headers for the C++ files of a target (not its .cu files: nvcc has no PCH).
function(anvil_precompile_torch_headers target)
  target_precompile_headers(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CXX>:${PROJECT_SOURCE_DIR}/csrc/pch.h>")
endfunction()

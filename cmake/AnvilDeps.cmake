# Third-party libraries, each from the place docs/ARCHITECTURE.md ("Dependencies") chose on purpose:
# Debian's packages for nlohmann/json, cxxopts, sentencepiece and GoogleTest; PyPI's nvidia-cutlass
# for the CUTLASS/CuTe headers (header-only; needed by the Hopper GEMMs only).

find_package(nlohmann_json 3.10 REQUIRED)
find_package(cxxopts REQUIRED)

# sentencepiece ships no CMake config on Debian.
find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h)
find_library(SENTENCEPIECE_LIBRARY sentencepiece)
if(SENTENCEPIECE_INCLUDE_DIR AND SENTENCEPIECE_LIBRARY)
  add_library(anvil::sentencepiece UNKNOWN IMPORTED)
  set_target_properties(anvil::sentencepiece PROPERTIES
    IMPORTED_LOCATION ${SENTENCEPIECE_LIBRARY}
    INTERFACE_INCLUDE_DIRECTORIES ${SENTENCEPIECE_INCLUDE_DIR})
else()
  message(FATAL_ERROR "anvil: libsentencepiece-dev not found (scripts/setup.sh installs it)")
endif()

# PCRE2 (8-bit, UTF + UCP): the pre-tokenizer regexes of tokenizer.json files (\p{L}, lookaheads).
find_path(PCRE2_INCLUDE_DIR pcre2.h)
find_library(PCRE2_LIBRARY pcre2-8)
if(PCRE2_INCLUDE_DIR AND PCRE2_LIBRARY)
  add_library(anvil::pcre2 UNKNOWN IMPORTED)
  set_target_properties(anvil::pcre2 PROPERTIES
    IMPORTED_LOCATION ${PCRE2_LIBRARY}
    INTERFACE_INCLUDE_DIRECTORIES ${PCRE2_INCLUDE_DIR})
else()
  message(FATAL_ERROR "anvil: libpcre2-dev not found (scripts/setup.sh installs it)")
endif()

# utf8proc: Unicode normalization (NFC/NFKC...) of tokenizer.json normalizers.
find_path(UTF8PROC_INCLUDE_DIR utf8proc.h)
find_library(UTF8PROC_LIBRARY utf8proc)
if(UTF8PROC_INCLUDE_DIR AND UTF8PROC_LIBRARY)
  add_library(anvil::utf8proc UNKNOWN IMPORTED)
  set_target_properties(anvil::utf8proc PROPERTIES
    IMPORTED_LOCATION ${UTF8PROC_LIBRARY}
    INTERFACE_INCLUDE_DIRECTORIES ${UTF8PROC_INCLUDE_DIR})
else()
  message(FATAL_ERROR "anvil: libutf8proc-dev not found (scripts/setup.sh installs it)")
endif()

# gloo's headers for torch's ProcessGroupGloo.hpp (csrc/train/distributed.cpp). The torch wheel ships the c10d
# headers and the compiled ProcessGroupGloo (libtorch_cpu.so), not the gloo headers they include. Debian's
# libgloo-dev (2022-05-18, 5b14351) is older than the gloo torch 2.11 builds, and that is safe here because
# the c10d header holds every gloo type through a pointer (shared_ptr<gloo::Context>,
# shared_ptr<gloo::transport::Device>, ...): ProcessGroupGloo's layout and its Options' do not depend on gloo's
# version, and anvil calls only c10d's exported functions. Nothing of gloo is compiled into anvil or linked
# (never link Gloo::gloo: libtorch_cpu.so holds torch's own gloo); tests/python/test_distributed.py checks that
# libanvil_core.so defines no gloo symbol and no GlooStore vtable.
find_path(ANVIL_GLOO_INCLUDE_DIR gloo/rendezvous/store.h)
if(NOT ANVIL_GLOO_INCLUDE_DIR)
  message(FATAL_ERROR "anvil: gloo headers not found (scripts/setup.sh installs libgloo-dev)")
endif()
set(ANVIL_GLOO_INCLUDE_DIRS "")
# Debian's /usr/include is searched already (naming it again breaks libstdc++'s #include_next).
if(NOT ANVIL_GLOO_INCLUDE_DIR STREQUAL "/usr/include")
  list(APPEND ANVIL_GLOO_INCLUDE_DIRS ${ANVIL_GLOO_INCLUDE_DIR})
endif()
# NCCL's header for ProcessGroupNCCL.hpp (CUDA builds): the nvidia-nccl wheel that torch depends on.
if(ANVIL_WITH_CUDA)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'include'))"
    OUTPUT_VARIABLE ANVIL_NCCL_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT EXISTS "${ANVIL_NCCL_INCLUDE_DIR}/nccl.h")
    message(FATAL_ERROR "anvil: nccl.h not found in the nvidia-nccl wheel of ${Python_EXECUTABLE} (torch's dependency)")
  endif()
  list(APPEND ANVIL_GLOO_INCLUDE_DIRS ${ANVIL_NCCL_INCLUDE_DIR})
endif()

if(ANVIL_TESTS)
  find_package(GTest REQUIRED)
endif()

# CUTLASS: -DANVIL_CUTLASS_DIR=<dir with include/cutlass>, else the nvidia-cutlass wheel of the Python
# that owns torch.
if(NOT ANVIL_CUTLASS_DIR)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
    OUTPUT_VARIABLE ANVIL_CUTLASS_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
set(ANVIL_CUTLASS_INCLUDE_DIR "")
if(ANVIL_CUTLASS_DIR AND EXISTS "${ANVIL_CUTLASS_DIR}/include/cutlass/cutlass.h")
  set(ANVIL_CUTLASS_INCLUDE_DIR ${ANVIL_CUTLASS_DIR}/include)
  add_library(anvil::cutlass INTERFACE IMPORTED)
  set_target_properties(anvil::cutlass PROPERTIES INTERFACE_INCLUDE_DIRECTORIES
    "${ANVIL_CUTLASS_DIR}/include;${ANVIL_CUTLASS_DIR}/tools/util/include")
elseif(ANVIL_OPS_HOPPER_SOURCES)
  message(FATAL_ERROR "anvil: CUTLASS headers not found; set ANVIL_CUTLASS_DIR or install nvidia-cutlass")
endif()

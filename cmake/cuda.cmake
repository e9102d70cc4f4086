# The optional CUDA module `jax_psroi._cuda`, controlled by JAX_PSROI_CUDA.
#
# The compiler, in this order: CMAKE_CUDA_COMPILER or CUDACXX if set, a
# system nvcc (PATH, /usr/local/cuda), then NVIDIA's pip toolchain
# (nvidia-cuda-nvcc and friends, under site-packages/nvidia/cu13) in the
# build's Python environment, which the build backend (build_backend/)
# installs there when it builds CUDA and finds no system nvcc.
set(JAX_PSROI_CUDA_VERSION "")
set(JAX_PSROI_CUDA_ARCHS "")
set(JAX_PSROI_CUDA_TOOLKIT "")
set(JAX_PSROI_CUDA_ARCHS_FROM "")

# Every architecture `nvcc --list-gpu-arch` names from sm_75 on, as SASS,
# and the newest also as PTX, which newer GPUs JIT-compile. Sets `out` to a
# CMAKE_CUDA_ARCHITECTURES list ("75-real;...;120-real;121").
function(jax_psroi_cuda_architectures nvcc out)
  execute_process(COMMAND "${nvcc}" --list-gpu-arch
                  OUTPUT_VARIABLE _listed RESULT_VARIABLE _status ERROR_QUIET)
  string(REGEX MATCHALL "compute_[0-9]+" _listed "${_listed}")
  set(_numbers "")
  foreach(_arch IN LISTS _listed)
    string(REPLACE "compute_" "" _number "${_arch}")
    if(_number GREATER_EQUAL 75)
      list(APPEND _numbers "${_number}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES _numbers)
  list(SORT _numbers COMPARE NATURAL)
  if(NOT _status EQUAL 0 OR NOT _numbers)
    message(FATAL_ERROR "jax_psroi: `${nvcc} --list-gpu-arch` named no architecture from "
                        "sm_75 on; set CMAKE_CUDA_ARCHITECTURES.")
  endif()
  list(POP_BACK _numbers _newest)
  list(TRANSFORM _numbers APPEND "-real")
  list(APPEND _numbers "${_newest}")
  set(${out} "${_numbers}" PARENT_SCOPE)
endfunction()

if(NOT JAX_PSROI_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c [=[
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations or []) if spec else []:
    if (pathlib.Path(root) / "cu13" / "bin" / "nvcc").is_file():
        print(pathlib.Path(root) / "cu13")
        break
]=]
      OUTPUT_VARIABLE _pip_toolkit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_pip_toolkit)
      # check_language() left a NOTFOUND in the cache and in a variable.
      set(CMAKE_CUDA_COMPILER "${_pip_toolkit}/bin/nvcc" CACHE FILEPATH "CUDA compiler" FORCE)
      set(CMAKE_CUDA_COMPILER "${_pip_toolkit}/bin/nvcc")
    endif()
  endif()

  if(CMAKE_CUDA_COMPILER)
    # The pip toolchain (found above, or named by CUDACXX as
    # scripts/build_wheels.sh does) keeps cudart and its headers beside nvcc.
    if(CMAKE_CUDA_COMPILER MATCHES "/nvidia/cu[0-9]+/bin/nvcc$")
      set(JAX_PSROI_CUDA_TOOLKIT "pip")
      get_filename_component(CUDAToolkit_ROOT "${CMAKE_CUDA_COMPILER}" DIRECTORY)
      get_filename_component(CUDAToolkit_ROOT "${CUDAToolkit_ROOT}" DIRECTORY)
      # The wheel ships libcudart.so.13 but no libcudart.so, which
      # FindCUDAToolkit requires although we link libcudart_static.a only.
      set(CUDA_CUDART "${CUDAToolkit_ROOT}/lib/libcudart.so.13" CACHE FILEPATH "")
    else()
      set(JAX_PSROI_CUDA_TOOLKIT "system")
    endif()
    # Must precede enable_language(CUDA): CMake silently ignores it afterwards
    # and builds for one default architecture only. CUDAARCHS (CMake's own
    # variable) or -DCMAKE_CUDA_ARCHITECTURES overrides the list.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND "$ENV{CUDAARCHS}" STREQUAL "")
      jax_psroi_cuda_architectures("${CMAKE_CUDA_COMPILER}" CMAKE_CUDA_ARCHITECTURES)
      set(JAX_PSROI_CUDA_ARCHS_FROM "nvcc")
    else()
      set(JAX_PSROI_CUDA_ARCHS_FROM "user")
    endif()
    enable_language(CUDA)
    message(STATUS "jax_psroi: CUDA ${CMAKE_CUDA_COMPILER_VERSION} kernels with "
                   "${CMAKE_CUDA_COMPILER} (${JAX_PSROI_CUDA_TOOLKIT}) for "
                   "${CMAKE_CUDA_ARCHITECTURES}")
    find_package(CUDAToolkit REQUIRED)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)

    # The kernels and their FFI handlers, apart from the Python module: they
    # see no Python or nanobind headers, so their objects do not depend on
    # the Python being built for, and a build directory reused for another
    # Python (scripts/build_wheels.sh) does not compile them again.
    add_library(jax_psroi_cuda_handlers OBJECT lib/cuda/cuda_handlers.cu lib/cuda/nms_handlers.cu
      lib/cuda/deformable_handlers.cu)
    target_include_directories(jax_psroi_cuda_handlers PRIVATE "${JAX_PSROI_LIB}")
    target_include_directories(jax_psroi_cuda_handlers SYSTEM PRIVATE "${XLA_INCLUDE_DIR}")
    # No fused multiply-add: the GPU then rounds like the CPU kernels that
    # the tests check; the kernels are bound by memory, not by arithmetic.
    target_compile_options(jax_psroi_cuda_handlers PRIVATE --fmad=false)
    # Each architecture is its own cicc and ptxas run: nvcc runs them side
    # by side on every core.
    target_compile_options(jax_psroi_cuda_handlers PRIVATE --threads=0)

    nanobind_add_module(_cuda NB_STATIC STABLE_ABI lib/cuda/cuda_module.cc)
    target_include_directories(_cuda PRIVATE "${JAX_PSROI_LIB}")
    target_include_directories(_cuda SYSTEM PRIVATE "${XLA_INCLUDE_DIR}")
    # Static runtime: the module imports on machines without a GPU or
    # libcudart, and needs nothing of CUDA but the driver.
    set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
    target_link_libraries(_cuda PRIVATE jax_psroi_cuda_handlers CUDA::cudart_static)
    install(TARGETS _cuda LIBRARY DESTINATION jax_psroi)

    set(JAX_PSROI_CUDA_VERSION "${CMAKE_CUDA_COMPILER_VERSION}")
    set(JAX_PSROI_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
    if(CMAKE_CUDA_ARCHITECTURES STREQUAL "native")
      # What CMake found on this machine's GPUs (not run here: no GPU).
      set(JAX_PSROI_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES_NATIVE}")
    endif()
  elseif(JAX_PSROI_CUDA STREQUAL "ON")
    message(FATAL_ERROR
      "jax_psroi: JAX_PSROI_CUDA=ON but no CUDA compiler was found: no nvcc on "
      "PATH or in /usr/local/cuda, and NVIDIA's pip toolchain (nvidia-cuda-nvcc) "
      "is not in this build's Python environment. `pip install .` installs the "
      "toolchain into its isolated build environment by itself; with "
      "--no-build-isolation, first run `pip install \"nvidia-cuda-nvcc>=13,<14\" "
      "\"nvidia-nvvm>=13,<14\" \"nvidia-cuda-crt>=13,<14\" \"nvidia-cuda-runtime>=13,<14\" "
      "\"nvidia-cuda-cccl>=13,<14\"`, or set CUDACXX to an nvcc. To build the CPU "
      "kernels only, set JAX_PSROI_CUDA=OFF.")
  else()
    message(STATUS "jax_psroi: no CUDA compiler found, building the CPU kernels only")
  endif()
endif()

# The optional CUDA module `jax_psroi._cuda`, controlled by JAX_PSROI_CUDA.
set(JAX_PSROI_CUDA_VERSION "")
set(JAX_PSROI_CUDA_ARCHS "")

if(NOT JAX_PSROI_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # Must precede enable_language(CUDA): CMake silently ignores it afterwards
    # and builds for one default architecture only. 90 is also embedded as PTX
    # so newer GPUs JIT-compile it.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)

    nanobind_add_module(_cuda NB_STATIC STABLE_ABI
      lib/cuda/cuda_module.cc
      lib/cuda/cuda_handlers.cu)
    target_include_directories(_cuda PRIVATE "${JAX_PSROI_LIB}")
    target_include_directories(_cuda SYSTEM PRIVATE "${XLA_INCLUDE_DIR}")
    # No fused multiply-add: the GPU then rounds like the CPU kernels that
    # the tests check, at no measurable cost for this memory-bound operator.
    target_compile_options(_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false>)
    # Static runtime: the module imports on machines without a GPU or libcudart.
    set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
    target_link_libraries(_cuda PRIVATE CUDA::cudart_static)
    install(TARGETS _cuda LIBRARY DESTINATION jax_psroi)

    set(JAX_PSROI_CUDA_VERSION "${CMAKE_CUDA_COMPILER_VERSION}")
    set(JAX_PSROI_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
  elseif(JAX_PSROI_CUDA STREQUAL "ON")
    message(FATAL_ERROR
      "JAX_PSROI_CUDA=ON but no CUDA compiler was found. Put nvcc on PATH or "
      "set CUDACXX, or build without CUDA (JAX_PSROI_CUDA=OFF).")
  else()
    message(STATUS "nvcc not found: building without CUDA kernels")
  endif()
endif()

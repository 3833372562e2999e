# Included into CI's colcon builds of interface packages (CMAKE_PROJECT_INCLUDE), for the ROS 2 Jazzy wheels
# from PyPI only: their exported <pkg>__rosidl_generator_py targets name the Python headers and numpy of the
# machine the wheels were built on (/opt/python/cp311-cp311/...), which CMake refuses at generate time
# ("includes non-existent path"). At the end of configuring, every imported target that names them is
# pointed at this machine's Python 3.11 headers and numpy instead; nothing outside the build is touched.
find_package(Python3 REQUIRED COMPONENTS Interpreter Development NumPy)

function(_fluorosam_fix_wheel_targets)
  get_directory_property(_targets IMPORTED_TARGETS)
  foreach(_target IN LISTS _targets)
    get_target_property(_includes ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(_includes AND _includes MATCHES "/opt/python/cp311-cp311/")
      list(TRANSFORM _includes REPLACE "^/opt/python/cp311-cp311/include/python3.11$" "${Python3_INCLUDE_DIRS}")
      list(TRANSFORM _includes REPLACE "^/opt/python/cp311-cp311/.*/numpy/_core/include$" "${Python3_NumPy_INCLUDE_DIRS}")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_includes}")
    endif()
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL _fluorosam_fix_wheel_targets)

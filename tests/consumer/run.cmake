# Installs the build tree into a scratch prefix, then configures, builds and runs
# the consumer project against it. Arguments: SOURCE BUILD WORK CONSUMER.
file(REMOVE_RECURSE "${WORK}")
set(prefix "${WORK}/prefix")
execute_process(COMMAND ${CMAKE_COMMAND} --install "${BUILD}" --prefix "${prefix}"
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "install failed: ${rc}")
endif()
# The tools (tools/include/sparsevlm: io/ with nlohmann-json and libpng, and the
# FLOPs accounting budget.hpp) are not installed.
foreach(tool io budget.hpp)
  if(EXISTS "${prefix}/include/sparsevlm/${tool}")
    message(FATAL_ERROR "${prefix}/include/sparsevlm/${tool}: installed, expected the tools to stay in the tree")
  endif()
endforeach()
execute_process(COMMAND ${CMAKE_COMMAND} -S "${CONSUMER}" -B "${WORK}/build"
                        -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer failed: ${rc}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build "${WORK}/build" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer failed: ${rc}")
endif()
execute_process(COMMAND "${WORK}/build/consumer" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the consumer returned ${rc}")
endif()
message(STATUS "find_package(sparsevlm) consumer: ok")

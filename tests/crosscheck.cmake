# Generates random spec cases with the independent NumPy reference
# (tools/crosscheck) and checks the CLI against every one of them.
# Arguments: PYTHON, TOOLS, CLI, WORK, COUNT, SEED.
file(REMOVE_RECURSE "${WORK}")
execute_process(COMMAND "${PYTHON}" "${TOOLS}/generate.py" "${WORK}" --count ${COUNT} --seed ${SEED}
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(rc)
  message(FATAL_ERROR "generating cases failed (${rc}): ${err}")
endif()
execute_process(COMMAND "${PYTHON}" "${TOOLS}/run_checks.py" "${WORK}" --cli "${CLI}" -j 2
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(rc)
  message(FATAL_ERROR "the CLI disagrees with the reference (${rc}): ${err}")
endif()

#!/bin/sh
# imd under valgrind memcheck, for the integration suites (IMD=this script,
# MEMCHECK_IMD=the binary): any memory error or definite leak makes imd exit 99,
# which the suites report as an unclean exit.
exec valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
  --show-leak-kinds=definite "${MEMCHECK_IMD:?set MEMCHECK_IMD to the imd binary}" "$@"

# Shell pieces shared by bench/run.sh and bench/wasm-startup.sh (sourced).
# Needs ROOT (the checkout) and SLUICE_GIVEN (a given SLUICE_BIN, or empty).

sluice_desc() { # what the sluice binary is: the checkout it was built from, or the given path
  if [[ -n "$SLUICE_GIVEN" ]]; then
    echo "$SLUICE_GIVEN (given; built $(stat -c %y "$SLUICE_GIVEN" | cut -d. -f1))"
  else
    echo "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- proxy src 2>/dev/null || echo ' (+ uncommitted changes)')"
  fi
}

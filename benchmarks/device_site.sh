# Sourced by the device scripts (gpu_dag.sh, learning_sweep.sh): the carried wheels ($WHL, default .whl) installed once
# into /tmp/site on the lent machine, which keeps it between calls while warm; then on the path.
WHL=${WHL:-.whl}
if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
    touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH

# Shared by the test scripts: `source scripts/lib.sh`.

# isolate_run ID: points drawdown (and the generator) at a consumer group and topics of their
# own, `ID` and `ID-<role>`, so a run never sees another run's records.
isolate_run() {
    local id=$1 t
    export DRAWDOWN__KAFKA__GROUP_ID="$id"
    for t in usage grants balance_changed balance_exhausted dlq top_up_requests changelog; do
        export "DRAWDOWN__TOPICS__${t^^}=$id-$t"
    done
}

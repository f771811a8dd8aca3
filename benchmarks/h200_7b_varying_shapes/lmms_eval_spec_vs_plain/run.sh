source scripts/gpu_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
R=build/r23; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee $R/gpu.txt
for spec in "plain_b64|use_msd=false,max_length=1024,prefetch=64|64" "eagle2_b32|tree=eagle2,max_length=1024,batched_drafting=true,batch_node_budgets=1:58;32:7;64:3,prefetch=32|32"; do
  IFS='|' read name args bs <<< "$spec"
  timeout 120 python3 -m lmms_eval --model llava_msd_calibrated --model_args "inflate=7b,$args,stats_path=$R/$name.json" \
     --tasks msd_chartqa_synth_long --include_path tasks --limit 128 --batch_size $bs --output_path $R/$name --log_samples > $R/$name.log 2>&1
  echo "$name rc=$?"
  python3 -c "
import json; d=json.load(open('$R/$name.json')); o=d.get('overall',{})
print({k: o.get(k) for k in ('tau','tokens_per_s','samples','new_tokens','wall_s','prefill_s')}, {k: d.get(k) for k in ('generate_until_s','documents_per_s')})"
done
tar czf $OUT/r23.tgz $R

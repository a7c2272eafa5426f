timeout 200 python3 -m pytest_amk.cli bench schedules/llama-3.2-1b-shape.toml --no-compile --runs 50 > $OUT/bench.txt 2>&1; grep -E "floor|megakernel|torch|best|measured" $OUT/bench.txt | head -12

-- The precision a job's products run in on its worker (`f32` or `bf16`: the `precision`
-- parameter with `auto` resolved), set when its training starts.
alter table jobs add column precision text;

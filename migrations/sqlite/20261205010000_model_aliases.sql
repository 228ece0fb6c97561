-- Names that point at a model (`PUT /aliases/{name}`), for `/predict?model=<name>`: clients
-- keep one name while the model behind it is replaced. No foreign key: deleting a model that a
-- name points at is refused (`db::models::delete`).
create table model_aliases (
    name        text primary key,
    model_id    text not null,
    updated_at  text not null
);
create index model_aliases_model on model_aliases (model_id);
